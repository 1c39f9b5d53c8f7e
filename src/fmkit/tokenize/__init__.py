"""Tokenizer training and packing documents into token shards."""
