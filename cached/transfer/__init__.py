"""Moving bytes: plan (pure: which piece from whom), blob (fetches one blob by running the plan),
retry (the one origin retry policy), model (a ref's fetch, verify and repair)."""
