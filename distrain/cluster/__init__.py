"""Launchers: Ray Train (``ray``); each ends in ``distrain.train.run`` on every worker."""
