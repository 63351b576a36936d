"""A pydantic-typed skill: the input is validated into `Reading`, the output is a model too."""

from typing import Literal

from pydantic import BaseModel, Field


class Reading(BaseModel):
    value: float
    unit: Literal["C", "F", "K"]
    to: Literal["C", "F", "K"] = "C"


class Converted(BaseModel):
    value: float = Field(description="rounded to 2 decimals")
    unit: str


def _to_celsius(value: float, unit: str) -> float:
    return {"C": value, "F": (value - 32) * 5 / 9, "K": value - 273.15}[unit]


def _from_celsius(value: float, unit: str) -> float:
    return {"C": value, "F": value * 9 / 5 + 32, "K": value + 273.15}[unit]


def run(input: Reading) -> Converted:
    celsius = _to_celsius(input.value, input.unit)
    return Converted(value=round(_from_celsius(celsius, input.to), 2), unit=input.to)
