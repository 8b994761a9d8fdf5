"""Recursion-of-thought (Pie's recursion-of-thought benchmark, the version with tags): the model decides
whether it can answer a problem directly (<leaf>answer</leaf>) or splits it into two independent subtasks
(<branch>...</branch> twice); subtasks are solved recursively and concurrently, and the two solutions
are merged. Every call is a fork of the system prompt's context, which is prefilled once.

    pie run examples/recursion_of_thought.py -- --question "Please calculate (42 + 3) * 5 / 15." --max-depth 2

Returns JSON {"answer", "trace"}: trace lists each node as [path, kind, text] ("l"/"r" per level).
Pie's newest version of this program makes the model answer in JSON under an EBNF grammar; that needs
grammar-constrained generation (inferlet.Ebnf), which pie does not have yet.
"""

import asyncio
import json
import re

from inferlet import Context, Model, Sampler, runtime

DIVIDE = (
    "Your task is to analyze the given problem and decide whether it can be solved directly or needs to be "
    "divided into smaller subproblems. If the problem is simple and can be solved immediately, provide the "
    "solution wrapped in `<leaf>THE ANSWER</leaf>`. If not, divide the problem into exactly two independent "
    "subtasks such that solving these subtasks and combining their solutions will lead to the solution of "
    "the original problem. Present the subtasks wrapped in `<branch>SUBTASK 1</branch>` and "
    "`<branch>SUBTASK 2</branch>`. Be concise and ensure the subtasks are distinct and solvable. Please also "
    "ensure that the description of the subtasks is clear and self-contained, that is, each subtask should "
    "be able to be solved independently of the other. One subtask should not depend on the result of the "
    "other subtask. Problem: {}"
)
SOLVE = "Now, please solve the problem. Reason step-by-step. Make your response short."
MERGE = "Now, please merge the two solutions into one. Make your response short."


def parse_response(response: str) -> str | tuple[str, str] | None:
    """A leaf's answer (str), two subtasks (tuple), or None when the response has neither form."""
    leaf = re.search(r"<leaf>(.*?)</leaf>", response, flags=re.S)
    if leaf:
        return leaf.group(1).strip()
    branches = [b.strip() for b in re.findall(r"<branch>(.*?)</branch>", response, flags=re.S)]
    return (branches[0], branches[1]) if len(branches) == 2 else None


class Solver:
    def __init__(self, root: Context, max_depth: int, max_tokens: int) -> None:
        self.root, self.max_depth, self.max_tokens = root, max_depth, max_tokens
        self.trace: list[list[str]] = []

    async def ask(self, prompt: str) -> str:
        ctx = self.root.fork()
        ctx.user(prompt)
        text = await ctx.generate(Sampler.argmax(), max_tokens=self.max_tokens).collect_text()
        ctx.release()
        return text

    async def solve(self, question: str, path: str = "") -> str:
        if len(path) >= self.max_depth:  # deep enough: answer directly
            answer = await self.ask(f"{SOLVE} {question}")
            self.trace.append([path, "solve", answer])
            return answer
        response = await self.ask(DIVIDE.format(question))
        parsed = parse_response(response)
        if parsed is None:
            self.trace.append([path, "error", response])
            return f"Parsing Error: expected a <leaf> tag or exactly two <branch> tags in {response!r}"
        if isinstance(parsed, str):
            self.trace.append([path, "leaf", parsed])
            return parsed
        self.trace.append([path, "branch", " | ".join(parsed)])
        first, second = await asyncio.gather(
            self.solve(parsed[0], path + "l"), self.solve(parsed[1], path + "r")
        )
        merged = await self.ask(f"Subtask 1 solution: {first}\nSubtask 2 solution: {second}\n{MERGE}")
        self.trace.append([path, "merge", merged])
        return merged


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    root = Context(model)
    root.system("You are a helpful, respectful and honest assistant.")
    await root.flush()
    solver = Solver(root, int(input.get("max_depth", 5)), int(input.get("max_tokens", 128)))
    answer = await solver.solve(input.get("question", "Please calculate the expression (42 + 3) * 5 / 15."))
    root.release()
    return json.dumps({"answer": answer, "trace": solver.trace})
