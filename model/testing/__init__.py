"""Test support that ships with the package: a random tiny checkpoint in the official layout (with
its tokenizer), and the replay of golden cases recorded from the official BAGEL code.
"""
