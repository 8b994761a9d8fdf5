"""Built-in inferlets (`pie run text-completion`, `pie run raw-completion`) and the loader that finds
an inferlet's `async def main(input)` by name or path."""
