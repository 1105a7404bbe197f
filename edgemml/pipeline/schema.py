"""JSON Schema of pipeline.yaml and the option tables of `edgemml stages`, generated from the
pydantic models so that documentation never drifts from what the loader accepts."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticUndefined

from edgemml import stages
from edgemml.config import PipelineConfig


def pipeline_json_schema() -> dict[str, Any]:
    """The schema of a whole pipeline file: the top level, with `stages` items one of the
    registered stage configs (selected by `type`)."""
    stage_models = [stages.get(name).Config for name in stages.names()]
    models: list[tuple[type[BaseModel], str]] = [(PipelineConfig, "validation")]
    models += [(m, "validation") for m in stage_models]
    refs, top = models_json_schema(models, ref_template="#/$defs/{model}")
    defs = top.get("$defs", {})
    root_ref = refs[(PipelineConfig, "validation")]["$ref"].split("/")[-1]
    schema = dict(defs.pop(root_ref))
    stage_refs = [refs[(m, "validation")] for m in stage_models]
    schema["properties"] = dict(schema["properties"])
    stage_prop = dict(schema["properties"]["stages"])
    stage_prop["items"] = {"oneOf": stage_refs} if stage_refs else {"type": "object"}
    schema["properties"]["stages"] = stage_prop
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "edgemml pipeline"
    schema["$defs"] = defs
    return schema


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    text = re.sub(r"\bedgemml\.[\w.]*\.(?=[A-Za-z_]\w*)", "", text)  # the class name is enough
    return text.replace("typing.", "").replace("pathlib.", "")


def describe_fields(model: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """(option, type, default, description) rows for a config model."""
    rows = []
    for name, info in model.model_fields.items():
        if info.default is PydanticUndefined and info.default_factory is None:
            default = "(required)"
        elif info.default_factory is not None:
            try:
                default = json.dumps(info.default_factory(), default=str)  # type: ignore[call-arg]
            except TypeError:
                default = "(computed)"
        else:
            value = info.default
            default = json.dumps(value.model_dump(mode="json") if isinstance(value, BaseModel)
                                 else value, default=str)
        rows.append((name, _type_name(info.annotation), default, info.description or ""))
    return rows
