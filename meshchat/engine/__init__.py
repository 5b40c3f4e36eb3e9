"""Runs layers on this machine: llama.cpp stages, tokenizer and chat template, sampling."""
