"""Prefix tree: 8 prompts that share a 3-level tree of prefixes (Pie's prefix-tree benchmark).

                         [system prompt]
                       /                 \\
        [photosynthesis]                 [cellular respiration]
        /              \\                     /                \\
   [ELI5]            [high school]   [location in cell]     [main products]
   /    \\           /            \\         /         \\          /    \\
 [chef] [sunlight] [equation] [algae] [mitochondria] [plant/animal] [ATP] [CO2]

Every node is prefilled once, in a context forked from its parent: the forks share the parent's KV pages
(copy-on-write), so the 8 leaves hold one copy of the system prompt and of each inner turn. The leaves
then generate concurrently (their decode steps share batches).

    pie run examples/prefix_tree.py -- --num-tokens 32
"""

import asyncio
import json

from inferlet import Context, Model, Sampler, runtime

SYSTEM = (
    "You are a helpful, friendly, and knowledgeable science tutor for students of all ages. Your goal is "
    "to explain complex biological concepts in a clear, accessible, and engaging manner, tailoring your "
    "language to the specified audience."
)

# (user turn, children); the leaves are the prompts that generate
TREE: list[tuple[str, list]] = [
    (
        "I'm curious about the fundamental process of photosynthesis. Could you provide a detailed overview "
        "of how plants create their own food using sunlight, water, and carbon dioxide?",
        [
            (
                "That sounds complicated. Could you simplify it significantly for me? Please explain the core "
                "idea in a way that a curious 5-year-old child could easily grasp and remember. Use a simple "
                "analogy.",
                [
                    "I love cooking! Can you explain the main idea of this process to me by comparing it to a "
                    "chef's recipe in a kitchen? What are the ingredients, and what is the final dish that the "
                    "plant creates?",
                    "My favorite thing is playing outside in the sunshine. How does sunlight specifically help "
                    "a plant? If I covered a plant and blocked all the light, what would happen to it over "
                    "time, and why?",
                ],
            ),
            (
                "Thank you. Now, could you provide a more technical explanation suitable for a high school "
                "biology student? I'm familiar with basic cell biology and chemistry, so please include "
                "relevant terminology like chloroplasts, chlorophyll, and light-dependent reactions.",
                [
                    "For my exam, I need to know the specific chemical equation for this process. Can you "
                    "write it out with the proper reactants and products, and briefly explain what each "
                    "component represents?",
                    "Beyond typical land plants, do other organisms like algae or certain bacteria also "
                    "perform this same process? How does their approach differ from what happens in a typical "
                    "green leaf?",
                ],
            ),
        ],
    ),
    (
        "Now, could you explain the equally important process of cellular respiration? I'd like to understand "
        "how organisms, including plants and animals, break down glucose to release the energy needed for "
        "life.",
        [
            (
                "I'm interested in the specific location within the cell where this process occurs. Can you "
                "describe the organelles involved and why their specific structures are uniquely suited for "
                "this essential energy-releasing function?",
                [
                    "Please elaborate specifically on the role of the mitochondria. Describe its inner and outer "
                    "membranes and the matrix, and explain how this structure makes it the perfect "
                    "'powerhouse' of the cell during this process.",
                    "Is this metabolic pathway entirely identical in both plant and animal cells? Please "
                    "compare and contrast the process, highlighting any key similarities or differences in "
                    "where or how cellular respiration occurs in these two major kingdoms.",
                ],
            ),
            (
                "Focusing on the outputs of this metabolic reaction, what are the primary products that result "
                "from this process? Please list and briefly describe the significance of each of these "
                "molecules for the cell.",
                [
                    "One of the key products is usable energy. Could you explain in detail the role of "
                    "adenosine triphosphate (ATP) as the main energy currency? How is it synthesized and then "
                    "used by the cell to power its activities?",
                    "I understand that carbon dioxide is considered a waste product of this process. Can you "
                    "elaborate on what exactly happens to this CO2? How does the organism expel it, and what "
                    "is its ultimate fate in the larger ecosystem?",
                ],
            ),
        ],
    ),
]


async def build_tree(model: Model) -> tuple[list[Context], list[Context]]:
    """Prefill the tree level by level, each node in a fork of its parent; (leaf contexts, inner nodes).
    The leaves hold their last user turn and the cue in the buffer (generate() runs it)."""
    root = Context(model)
    root.system(SYSTEM)
    await root.flush()
    inner, level = [root], [(root, TREE)]
    while level:
        nodes = []
        for parent, children in level:
            for child in children:
                ctx = parent.fork()
                if isinstance(child, str):  # a leaf
                    nodes.append((ctx.user(child).cue(), None))
                else:
                    nodes.append((ctx.user(child[0]), child[1]))
        await asyncio.gather(*(ctx.flush() for ctx, kids in nodes if kids is not None))
        inner += [ctx for ctx, kids in nodes if kids is not None]
        if all(kids is None for _, kids in nodes):
            return [ctx for ctx, _ in nodes], inner
        level = [(ctx, kids) for ctx, kids in nodes if kids is not None]
    raise AssertionError("unreachable: the tree has leaves")


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    leaves, inner = await build_tree(model)
    for ctx in inner:  # the leaves keep the shared pages alive on their own
        ctx.release()
    num_tokens = int(input.get("num_tokens", 128))
    texts = await asyncio.gather(
        *(ctx.generate(Sampler.argmax(), max_tokens=num_tokens).collect_text() for ctx in leaves)
    )
    return json.dumps(texts)
