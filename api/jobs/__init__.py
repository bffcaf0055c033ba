"""Job lifecycle: every state transition lives in `api.jobs.state`."""
