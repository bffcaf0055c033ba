"""The `distillery` command: the one entry point that puts the client, the service and the engine together.

`pip install distillery` gives the client commands; the server commands (`serve`, `api`,
`worker`, `admin`, `distill`) import their packages only when run and say which extra to install
where it is missing.
"""
