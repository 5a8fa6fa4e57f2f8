"""The terminal chat: session and commands, teaching, team chat, session log, and the shipped tools.

Imports the engine (`hfmodel`) and the root modules (`huggingface_model`, `finetune_dialogagent`); nothing below
imports this package. Kept empty so `from chat.tools import calculator` stays light (no torch).
"""
