"""A deterministic stand-in for the tutorial's model: no network, no LLM.

It answers what the runtime-context tutorial asks (the weather, arithmetic such as 2+5, "add 34 to that")
the same way every time, so tests can check session continuity and isolation exactly.
"""
import re

USERS = {"1": "Maira", "2": "Mani", "3": "Mark", "4": "Ishan", "5": "Dhawal"}

_ADD_EN = re.compile(r"\b(?:add|plus)\s+(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_ADD_JA = re.compile(r"(-?\d+(?:\.\d+)?)\s*を?\s*足")
_EXPRESSION = re.compile(r"(-?\d+(?:\.\d+)?)\s*([+\-*/×÷])\s*(-?\d+(?:\.\d+)?)")


def _number(value):
    return int(value) if float(value).is_integer() else value


class StandInModel:
    """One conversation: remembers the last numeric result, as the tutorial's agent does in memory."""

    def __init__(self):
        self.previous = None

    def answer(self, prompt, user=None):
        """(answer, message); answer is None when it cannot be given."""
        greeting = f"{user}, " if user else ""
        addition = _ADD_EN.search(prompt) or _ADD_JA.search(prompt)
        if addition and not _EXPRESSION.search(prompt):
            n = float(addition.group(1))
            if self.previous is None:
                return None, f"{greeting}there is no previous result in this session to add {_number(n)} to."
            total = self.previous + n
            message = f"{greeting}{_number(self.previous)} + {_number(n)} = {_number(total)}."
            self.previous = total
            return _number(total), message
        if "天気" in prompt or "weather" in prompt.lower():
            return "sunny", f"{greeting}the weather is sunny."
        expression = _EXPRESSION.search(prompt)
        if expression:
            a, op, b = float(expression.group(1)), expression.group(2), float(expression.group(3))
            value = {"+": a + b, "-": a - b, "*": a * b, "×": a * b, "/": a / b if b else None, "÷": a / b if b else None}[op]
            if value is None:
                return None, f"{greeting}division by zero has no answer."
            self.previous = value
            return _number(value), f"{greeting}{expression.group(0)} = {_number(value)}."
        return None, f"{greeting}I can tell the weather, work out arithmetic such as 2+5, and add a number to the last result."
