"""pie's runtime: what the SDK's contexts are handles to, and how their passes reach the driver.

pages       reference-counted KV pages: owner refs (sequences, snapshots, prefix cache) and pins
            (batches in flight)
sequence    one context's page table, tokens and positions
kvcache     copy-on-write forks, truncate, snapshots, the prefix cache, preemption, page movements
snapshots   named snapshots in memory and on disk ([runtime] snapshot_dir)
work        a forward pass or an engine-side generation over a sequence
scheduler   decode-first continuous batching, memory on demand, pipelined generation steps
batching    one ForwardBatch from the scheduled chunks, and its result split back
engine      the models, their drivers and schedulers; runs inferlets
scope       how SDK code finds its engine
"""
