"""A ReAct agent with a Python tool (a calculator): the model writes Thought / Action lines, the agent runs
`Action: calculator[EXPRESSION]` and appends `Observation: RESULT`, until `Final Answer:` or max_steps.

When the model's turn has no action and no final answer, the agent steers it back to the protocol by
writing `Action: calculator[` itself and letting the model fill in the expression (the usual way a ReAct
loop keeps a small model on format); every expression it writes is evaluated by the tool.

    pie run examples/react_agent.py -- --question "What is 12 * (3 + 4)?" --max-steps 3
"""

import ast
import json
import operator
import re

from inferlet import Context, Model, Sampler, chat

SYSTEM = (
    "Answer the question. You can use a calculator. Use this format:\n"
    "Thought: what to do next\nAction: calculator[2 * (3 + 4)]\nObservation: 14\n"
    "... (repeat Thought/Action/Observation)\nFinal Answer: the answer"
)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv,
        ast.USub: operator.neg, ast.UAdd: operator.pos}  # fmt: skip
ACTION = re.compile(r"Action:\s*calculator\[([^\]\n]*)\]")


def calculator(expression: str) -> str:
    """Evaluates + - * / // % ** on numbers; anything else is an error message (the tool never executes code)."""

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression: {ast.unparse(node)[:40]}")

    try:
        value = ev(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
        return f"error: {e}"
    return str(int(value) if isinstance(value, float) and value.is_integer() else value)


async def continue_until(ctx: Context, model: Model, stop_text: str, max_tokens: int) -> str:
    """Generate (greedy) until `stop_text` appears, the turn ends, or max_tokens."""
    text = ""
    dec = chat.Decoder(model)
    async for step in ctx.generate(Sampler.argmax(), max_tokens=max_tokens, auto_flush=False,
                                   stop=chat.stop_tokens(model)):  # fmt: skip
        event = dec.feed((await step.execute()).tokens)
        if isinstance(event, chat.Event.Done):
            return event.text
        if isinstance(event, chat.Event.Delta):
            text += event.text
            if stop_text in text:
                break
    return text


async def main(input: dict) -> str:
    model = Model.load()
    tok = model.tokenizer()
    max_steps, max_tokens = int(input.get("max_steps", 3)), int(input.get("max_tokens", 48))
    ctx = Context(model)
    ctx.system(SYSTEM).user(str(input.get("question", "What is 12 * (3 + 4)?"))).cue()
    ctx.append(tok.encode("Thought:"))
    trace = "Thought:"
    for _ in range(max_steps):
        text = await continue_until(ctx, model, "\nObservation:", max_tokens)
        trace += text
        if "Final Answer:" in text.split("Action:")[0]:
            break
        m = ACTION.search(text)
        if m is None:  # off protocol: write the action's start and let the model fill in the expression
            lead = "\nAction: calculator["
            ctx.append(tok.encode(lead))
            expr = (await continue_until(ctx, model, "]", 24)).split("]")[0].split("\n")[0]
            trace += lead + expr + "]"
            ctx.append(tok.encode("]"))
        else:
            expr = m.group(1)
            trace = trace[: len(trace) - len(text)] + text[: m.end()]
        observation = f"\nObservation: {calculator(expr)}\nThought:"
        ctx.append(tok.encode(observation))
        trace += observation
    else:
        ctx.append(tok.encode("\nFinal Answer:"))
        trace += "\nFinal Answer:" + await continue_until(ctx, model, "\n", max_tokens)
    answer = trace.rsplit("Final Answer:", 1)[-1].strip() if "Final Answer:" in trace else ""
    return json.dumps({"answer": answer, "trace": trace}, ensure_ascii=False)
