"""EBNF-constrained generation: the reply is a sentence of a grammar, in Pie's GBNF syntax (or Lark).

The grammar below (Pie's `constrained-decoding` example) describes a JSON list of people; the output is
checked against it, and the number of tokens the grammar forced is reported.

    pie run examples/ebnf.py -- --prompt "Three famous scientists and their birth years." --seed 1

Prints the generated text on the first line and the check on the second.
"""

import re

from inferlet import Context, Ebnf, Model, Sampler, runtime

GRAMMAR = r"""
root ::= "[" person ("," person)* "]"
person ::= "{" "\"name\"" ":" string "," "\"born\"" ":" number "}"
string ::= "\"" [A-Za-z ]{1,20} "\""
number ::= [0-9]{1,4}
"""
# the same language as a Python regex, to check the output independently of the grammar engine
CHECK = re.compile(
    r'\[\{"name":"[A-Za-z ]{1,20}","born":[0-9]{1,4}\}(,\{"name":"[A-Za-z ]{1,20}","born":[0-9]{1,4}\})*\]'
)


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    ctx = Context(model)
    ctx.system("You output structured data as compact JSON.")
    ctx.user(input.get("prompt", "List three famous scientists with their birth years."))
    seed = input.get("seed")
    sampler = Sampler.argmax() if seed is None else Sampler.top_k(1.0, 40, seed=int(seed))
    gen = ctx.generate(
        sampler, constrain=Ebnf(input.get("grammar", GRAMMAR)), max_tokens=int(input.get("max_tokens", 160))
    )
    text = await gen.collect_text()
    ended = "complete" if gen.tokens_generated < int(input.get("max_tokens", 160)) else "cut by max_tokens"
    valid = "valid" if CHECK.fullmatch(text) else "prefix" if ended != "complete" else "INVALID"
    return f"{text}\n[{valid}, {ended}, {gen.tokens_generated} tokens]"
