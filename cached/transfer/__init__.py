"""Moving bytes: plan (pure: which piece from whom), scheduler (runs it), model fetch and repair."""
