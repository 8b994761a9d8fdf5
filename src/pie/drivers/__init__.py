"""Drivers execute one batched forward pass (see protocol.py for the contract)."""
