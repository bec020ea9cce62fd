"""Toy variance study (App. E) and exact discrete bias/variance study."""
