"""The shipped models by name: ``model.name`` -> the module that defines the model, its config class
(a ``ModelSection``) and its ``SPEC``.

The one table both sides read, so that neither imports the other: the config schema imports the
named model's module when a config names it (model modules import no torch at import time), and the
model registry finds a ``SPEC`` by it. Adding a model is its file plus one line here."""

MODELS: dict[str, str] = {
    "gpt": "distrain.models.gpt",
    "resnet": "distrain.models.resnet",
    "lstm": "distrain.models.lstm",
    "gan": "distrain.models.gan",
    "vae": "distrain.models.vae",
}
