"""CA key custody: where CA private keys live and how they are unlocked, behind one interface."""
