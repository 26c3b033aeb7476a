"""Tables, migrations and database sessions. Imports nothing else of ours."""
