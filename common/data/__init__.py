"""Data: formats people bring -> one Conversation -> token ids and loss masks, the same for both backends."""
