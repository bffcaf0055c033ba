"""service: what the API and the workers share, with no FastAPI and no torch.

One settings object (`settings`), the database (`db`, `models`, `migrate`), the job state machine
(`state`), storage and its key layout (`storage`, `keys`), the queue (`queue`), and the domain
functions both sides call (`users`, `files`, `jobs`, `artifacts`, `events`), with the one error
they raise (`errors`), log set-up (`logs`), ids and API-key hashing (`ids`, `security`).
"""
