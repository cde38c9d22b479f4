"""The worker's side of the queue, as Redis scripts: each step is one atomic round trip.

Keys are arq's (``arq:job:``, ``arq:in-progress:``, ``arq:retry:``, ``arq:result:``
and the queue's sorted set), so arq producers and tools still understand them.
``arq:in-progress:<id>`` holds the token of the worker that leases the job.

The scripts are files in :mod:`llm_router.worker.lua`; each file's header gives its
KEYS, ARGV and returns.
"""

from __future__ import annotations

from llm_router.worker.lua import script

#: Find due jobs nobody holds, lease them and read them, from each queue in turn.
CLAIM = script("claim.lua")

#: Extend this worker's leases; returns the keys that are no longer this worker's.
RENEW = script("renew_leases.lua")

#: Store a job's result (the first wins) and release the lease, or hand the job back.
FINISH = script("finish.lua")

#: A waiting worker offers itself to producers, whose enqueue script hands it a job.
REGISTER = script("register_idle.lua")
