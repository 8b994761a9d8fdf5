"""Agent swarm over messaging: a coordinator launches worker agents (this same file, role "worker"); tasks
go out on a push/pull queue (each task to exactly one worker), answers come back on another queue, and a
broadcast tells every worker to stop.

    pie run examples/agent_swarm.py -- --workers 3 --topics "rivers|mountains|deserts|forests" --max-tokens 12
"""

import json

from inferlet import Context, Model, Sampler, messaging, runtime

TASKS, RESULTS, CONTROL, READY = "swarm/tasks", "swarm/results", "swarm/control", "swarm/ready"


async def worker(input: dict) -> str:
    me = int(input["id"])
    model = Model.load()
    done = 0
    with messaging.subscribe(CONTROL) as control:
        messaging.push(READY, str(me))  # subscribed: the coordinator's stop broadcast will reach us
        while True:
            task = json.loads(await messaging.pull(TASKS))
            if task is None:  # the coordinator's end marker: one per worker
                break
            ctx = Context(model)
            ctx.system(f"You are agent {me}. Answer in one sentence.").user(
                f"Say something about {task['topic']}."
            )
            text = await ctx.generate(Sampler.argmax(), max_tokens=int(input["max_tokens"])).collect_text()
            ctx.release()
            messaging.push(RESULTS, json.dumps({"task": task["id"], "worker": me, "text": text}))
            done += 1
        stop = await control.next()  # the broadcast every worker gets
    return json.dumps({"worker": me, "done": done, "stop": stop})


async def main(input: dict) -> str:
    if input.get("role") == "worker":
        return await worker(input)
    n = int(input.get("workers", 3))
    topics = str(input.get("topics", "rivers|mountains|deserts|forests")).split("|")
    max_tokens = int(input.get("max_tokens", 12))
    workers = [
        runtime.launch(__file__, {"role": "worker", "id": i, "max_tokens": max_tokens}) for i in range(n)
    ]
    for _ in range(n):
        await messaging.pull(READY)
    for i, topic in enumerate(topics):
        messaging.push(TASKS, json.dumps({"id": i, "topic": topic}))
    for _ in range(n):
        messaging.push(TASKS, json.dumps(None))
    results = sorted([json.loads(await messaging.pull(RESULTS)) for _ in topics], key=lambda r: r["task"])
    messaging.broadcast(CONTROL, "stop")
    reports = [json.loads(await w) for w in workers]
    return json.dumps({"results": results, "workers": reports}, ensure_ascii=False)
