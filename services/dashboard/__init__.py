"""The owner dashboard: its rules, view models and form parsing, usage reports, the connection
probe and install snippets. It may use every other area; none of them may use it."""
