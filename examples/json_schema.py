"""JSON-schema constrained generation: the reply is JSON that conforms to the schema by construction.

The schema compiles to a grammar (llguidance); at every step the generator masks the logits to the
tokens that keep the output inside it, and the chat stop token only where the JSON is complete. Any
sampler works: even a small model sampling at temperature 1 writes valid JSON.

    pie run examples/json_schema.py -- --prompt "A profile of a software engineer." --seed 3

Returns the parsed object as JSON (Pie's `python-constrained-decoding` example, on pie).
"""

import json

from inferlet import Context, JsonSchema, Model, Sampler, runtime

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "skills": {
            "type": "array",
            "items": {"type": "string", "maxLength": 16},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "skills"],
    "additionalProperties": False,
}


async def main(input: dict) -> dict:
    model = Model.load(runtime.models()[0])
    schema = json.dumps(input.get("schema") or PERSON_SCHEMA)
    ctx = Context(model)
    ctx.system("You generate structured data. Output only a JSON object.")
    ctx.user(input.get("prompt", "A profile of a fictional software engineer."))
    seed = input.get("seed")
    sampler = Sampler.argmax() if seed is None else Sampler.top_p(1.0, 0.95, seed=int(seed))
    gen = ctx.generate(sampler, constrain=JsonSchema(schema), max_tokens=int(input.get("max_tokens", 256)))
    return await gen.collect_json()  # parsed; collect_json(schema=...) alone would constrain too
