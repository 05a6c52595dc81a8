"""``Spec``: the base of every spec model in kdray (pipeline, stages, their blocks, sweeps, transfer
rules, transforms): unknown fields are errors, defaults are validated, ``.inf``/``.nan`` and booleans
for numbers are refused, and ``on``/``off`` read as YAML 1.1 writes them are taken as the words."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, model_validator


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)  # .inf, .nan: errors

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        """``epochs: true`` is a mistake, not 1: a number field refuses a boolean."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                v = data.get(field.alias or name, data.get(name))
                kinds = set(get_args(field.annotation)) | {field.annotation}
                if isinstance(v, bool) and bool not in kinds and kinds & {int, float}:
                    raise ValueError(f"{name}: expected a number, got {str(v).lower()}")
        return data

    @model_validator(mode="before")
    @classmethod
    def _on_off(cls, data: Any) -> Any:
        """``teacher_cache: off`` as the docs write it: YAML 1.1 reads unquoted on/off as booleans, so a field
        whose choices include "on" and "off" takes true as "on" and false as "off"."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                key = field.alias or name
                v = data.get(key)
                if isinstance(v, bool) and {"on", "off"} <= set(get_args(field.annotation)):
                    data = {**data, key: "on" if v else "off"}
        return data
