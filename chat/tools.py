"""Tools the chat ships for its agents, and how a script's `toolkit` list becomes an AgentScope `Toolkit`.

    toolkit = [calculator]                 # in load_finetune_huggingface_model.py
    toolkit = [calculator, my_function]    # your own function: one more entry (AgentScope asks before running it)

Shipped tools are read-only and run without asking. Nothing here evaluates text as code: the calculator walks the
expression's syntax tree and allows only numbers, + - * / ** and parentheses.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

MAX_CHARS = 1000  # an expression a model writes in one call; a longer one is split into steps
MAX_DEPTH = 100  # operations or parentheses inside each other (Python's own parser and evaluator recurse)
MAX_EXPONENT = 1000  # 10 ** 1000 is already beyond any use; bigger powers would take memory and time
MAX_DIGITS = 4000  # results longer than this are refused rather than printed
_OPERATORS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}


class CalculatorError(ValueError):
    """The expression is not plain arithmetic, or its result would be unreasonably large."""


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression (str): Numbers with + - * / ** and parentheses, e.g. "97 * 91".
    """
    text = str(expression).strip().replace("×", "*").replace("÷", "/").replace("^", "**")
    try:
        value = _evaluate(_parse(text))
    except SyntaxError:
        return f"error: {expression!r} is not an arithmetic expression (use numbers, + - * / ** and parentheses)"
    except ZeroDivisionError:
        return "error: division by zero"
    except OverflowError:
        return TOO_LARGE
    except CalculatorError as e:
        return f"error: {e}"
    return _format(value)


TOO_LARGE = "error: the result is too large (beyond about 1e308); use smaller numbers, or integers for exact results"
SPLIT = "compute it in smaller steps, one call each"


def _parse(text: str) -> ast.AST:
    """The expression's syntax tree, its size and depth bounded before anything recurses over it."""
    if len(text) > MAX_CHARS:
        raise CalculatorError(f"the expression is too long ({len(text)} characters, at most {MAX_CHARS}); {SPLIT}")
    if _paren_depth(text) > MAX_DEPTH:
        raise CalculatorError(f"the expression is too deeply nested (more than {MAX_DEPTH} levels); {SPLIT}")
    try:
        tree = ast.parse(text, mode="eval").body
    except (RecursionError, MemoryError):
        raise CalculatorError(f"the expression is too deeply nested (more than {MAX_DEPTH} levels); {SPLIT}") from None
    if _depth(tree) > MAX_DEPTH:
        raise CalculatorError(f"the expression is too deeply nested (more than {MAX_DEPTH} levels); {SPLIT}")
    return tree


def _paren_depth(text: str) -> int:
    deepest = depth = 0
    for char in text:
        depth += (char == "(") - (char == ")")
        deepest = max(deepest, depth)
    return deepest


def _depth(tree: ast.AST) -> int:
    """How many nodes deep the tree goes (iterative: any depth is safe to measure)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _evaluate(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise CalculatorError(f"the exponent {right:g} is too large (at most {MAX_EXPONENT})")
            if right > 0 and abs(left) > 1 and right * math.log10(abs(left)) > MAX_DIGITS:
                raise CalculatorError(f"the result has more than {MAX_DIGITS} digits")
        result = _OPERATORS[type(node.op)](left, right)
        if isinstance(result, complex):
            raise CalculatorError("the result is not a real number")
        if isinstance(result, int) and result.bit_length() > MAX_DIGITS * 3.33:
            raise CalculatorError(f"the result has more than {MAX_DIGITS} digits")
        return result
    raise CalculatorError(f"{ast.unparse(node)!r} is not allowed (only numbers, + - * / ** and parentheses)")


def _format(value: float | int) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return TOO_LARGE
        if value.is_integer() and abs(value) < 1e16:
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


SHIPPED: tuple[Callable[..., Any], ...] = (calculator,)
PURE: tuple[Callable[..., Any], ...] = (calculator,)  # the result depends only on the arguments


def pure_tool_names(tools: list[Any]) -> set[str]:
    """The names of the pure functions among `tools` (a toolkit list)."""
    return {t.__name__ for t in tools if t in PURE}


def make_toolkit(tools: list[Any] | None) -> Any:
    """An AgentScope Toolkit from plain functions (or ready `FunctionTool`s); None for an empty list.

    The shipped tools are read-only and allowed without asking; any other function goes through AgentScope's
    permission flow (the chat asks before running it).
    """
    if not tools:
        return None
    from agentscope.permission import PermissionBehavior, PermissionDecision
    from agentscope.tool import FunctionTool, Toolkit

    allow = PermissionDecision(behavior=PermissionBehavior.ALLOW, message="a read-only tool shipped with the chat")
    wrapped: list[Any] = [t if isinstance(t, FunctionTool) else
               FunctionTool(t, is_read_only=t in SHIPPED, permission=allow if t in SHIPPED else None)
               for t in tools]
    return Toolkit(tools=wrapped)
