"""Service functions: keyword-only, given a session; views translate HTTP to these calls."""
