"""The one base of shardctl's models: frozen values (new values, never mutation) that refuse
fields they do not know, so a typo or a stale field fails where it is made, not later.

`Declared` is the one documented variant, for what users write (engine/config/models.py): also
strict (`"4"` is not 4, and yes/1/"true" are not booleans, exactly as the JSON Schema says) and
finite (no inf or nan), since YAML would otherwise coerce what the schema refuses.
"""

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Declared(Frozen):
    model_config = ConfigDict(strict=True, allow_inf_nan=False)
