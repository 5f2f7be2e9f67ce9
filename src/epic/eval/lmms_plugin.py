"""The lmms-eval entry point: registers the model `epic` (`--model epic --model_args pretrained=PATH,method=dart,...`).

lmms-eval finds external models through the entry-point group `lmms_eval.models` (see pyproject.toml). The import of
lmms-eval happens inside the function: a top-level import here would be circular while lmms-eval loads plugins.
"""

from __future__ import annotations


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="epic", simple_class_path="epic.eval.lmms_model.EpicLmms")]
