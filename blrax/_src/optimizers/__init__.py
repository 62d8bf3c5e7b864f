"""The optimizers: engine configurations (ivon, von, vadam, vogn, bsam)
and the families with their own math on the engine's skeleton (full VON, EVON)."""
