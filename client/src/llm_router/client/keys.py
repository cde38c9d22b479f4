"""Every Redis key and channel llm-router uses, named once for producers and workers.

arq's data model, kept so that arq's own producers and tools still work: the job
(``arq:job:<id>``), its result (``arq:result:<id>``), the lease of a running job
(``arq:in-progress:<id>``), its try counter (``arq:retry:<id>``) and the queue, a
sorted set of job ids. Everything else is ours. A few Lua scripts build key names
from these prefixes themselves (their headers say which); a unit test holds the
scripts to this module. docs/protocol.md describes each key for producers in any
language.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_QUEUE = "llm_router:queue"
#: Backfills go here; workers serve it only with what the interactive queue leaves.
DEFAULT_BATCH_QUEUE = "llm_router:batch"

# --- arq's data model ------------------------------------------------------------------------

JOB_PREFIX = "arq:job:"
RESULT_PREFIX = "arq:result:"
#: The lease of a running job: its value is the token of the worker that runs it.
IN_PROGRESS_PREFIX = "arq:in-progress:"
#: How often the job has been started (INCR at each claim).
RETRY_PREFIX = "arq:retry:"


def job_key(job_id: str) -> str:
    return JOB_PREFIX + job_id


def result_key(job_id: str) -> str:
    return RESULT_PREFIX + job_id


def in_progress_key(job_id: str) -> str:
    return IN_PROGRESS_PREFIX + job_id


def retry_key(job_id: str) -> str:
    return RETRY_PREFIX + job_id


# --- ours: around each queue ------------------------------------------------------------------


def wake_key(queue_name: str) -> str:
    """The list idle workers block on; producers push a token after each enqueue."""
    return f"{queue_name}:wake"


def idle_key(queue_name: str) -> str:
    """Sorted set of waiting workers (member ``<token>|<lease ms>``, score = expiry ms)."""
    return f"{queue_name}:idle"


def inbox_key(queue_name: str, worker_token: str) -> str:
    """The list a waiting worker blocks on for jobs handed to it at enqueue."""
    return f"{queue_name}:inbox:{worker_token}"


#: Reply lists must start with this, so a job cannot make the worker push elsewhere.
REPLY_PREFIX = "llm_router:reply:"

#: A job's deadline: a key set at enqueue whose time to live, on Redis' clock, is what is
#: left of the job's ``expires_in`` (gone: the deadline has passed).
DEADLINE_PREFIX = "llm_router:deadline:"
#: A producer asked to cancel the job (``1``, kept a day); the channel tells running
#: workers at once.
CANCEL_PREFIX = "llm_router:cancel:"
CANCEL_CHANNEL = "llm_router:cancel"


def deadline_key(job_id: str) -> str:
    return DEADLINE_PREFIX + job_id


def cancel_key(job_id: str) -> str:
    return CANCEL_PREFIX + job_id


#: Jobs that ended ``failed`` or ``expired``: a sorted set (score: when, ms) and one entry
#: per job, ``<prefix><id>``, with its job blob and result, for ``llm-router failed``.
FAILED_KEY = "llm_router:failed"
FAILED_PREFIX = "llm_router:failed:"


def failed_key(job_id: str) -> str:
    return FAILED_PREFIX + job_id


# --- ours: shared state of the fleet ----------------------------------------------------------

METRICS_CHANNEL = "llm_router_metrics"
#: Field ``<model>|<outcome>``, an integer: every worker adds to the same totals.
METRICS_COUNTERS_KEY = "llm_router:metrics:counters"
#: ``1`` once a job has been counted and announced (a job that ran twice is counted once).
COUNTED_PREFIX = "llm_router:metrics:counted:"
#: Jobs whose result is stored but not yet counted and announced (score: when stored,
#: ms): a worker killed in between leaves them here for another to finish.
METRICS_PENDING_KEY = "llm_router:metrics:pending"

HEARTBEAT_PREFIX = "llm_router:worker:"
#: Sorted set of live workers: member the worker id, score when its heartbeat lapses (ms).
WORKERS_KEY = "llm_router:workers"


def heartbeat_key(worker_id: str) -> str:
    return HEARTBEAT_PREFIX + worker_id


#: A model's circuit breaker at one server: ``<prefix><model>@<api_base>``, a hash.
BREAKER_PREFIX = "llm_router:breaker:"


def breaker_key(endpoint: str) -> str:
    return BREAKER_PREFIX + endpoint


#: A model's capacity slots: ``<prefix><model>@<api_base>:holders|line|alive|tickets``,
#: and each process's wake-up list ``<prefix>wake:<process>``.
CAPACITY_PREFIX = "llm_router:capacity:"

#: A UTC day's spend hash ``<prefix><YYYY-MM-DD>`` and its budget holds ``…:holds``.
SPEND_PREFIX = "llm_router:spend:"


def spend_key(day: str) -> str:
    return SPEND_PREFIX + day


def holds_key(day: str) -> str:
    return SPEND_PREFIX + day + ":holds"


# --- Message Batches: parked jobs of the batch lane ---------------------------------------------

#: A parked job's state (JSON: the chain position, attempts so far, its batch request and,
#: once its batch ended, the result): ``<prefix><id>``. The job stays in its queue, scored
#: far in the future, until its result is in.
PARKED_PREFIX = "llm_router:parked:"
#: Sorted set of parked jobs still waiting for their batch (score: when parked, ms).
PARKED_KEY = "llm_router:parked"
#: The parked jobs that have a deadline (score: the deadline, Unix ms): past it, a job
#: goes back to its queue to end ``expired`` without waiting for its batch.
PARKED_DEADLINES_KEY = "llm_router:parked_deadlines"
#: A parked job is scored this far past its keeping time in its queue: a job scored more
#: than this far ahead is parked (arq's producers see it deferred).
PARKED_SCORE_MS = 365 * 86_400 * 1000
#: The Message Batches' shared state, one set of keys per fleet: see :class:`MsgBatchKeys`.
MSGBATCH_PREFIX = "llm_router:msgbatch:"
#: Once a minute one worker (of any fleet: the parked set is shared) looks for parked
#: jobs whose cancel nobody heard.
MSGBATCH_SWEEP_LEASE = "llm_router:msgbatch:lease:sweep"


def parked_key(job_id: str) -> str:
    return PARKED_PREFIX + job_id


@dataclass(frozen=True, slots=True)
class MsgBatchKeys:
    """One fleet's Message Batches, named after its batch queue: fleets that share a
    Redis (staging beside production, tests side by side) never send each other's
    requests or look at each other's batches, which their own keys and servers would
    bill wrongly or not find."""

    queue: str

    def pending(self, model: str) -> str:
        """Requests waiting to be sent to ``model`` (its label): a list of JSON entries."""
        return f"{MSGBATCH_PREFIX}pending:{self.queue}:{model}"

    @property
    def models(self) -> str:
        """Sorted set of the models with requests waiting (score: when the oldest was
        parked, ms; ``batch_wait`` counts from it)."""
        return f"{MSGBATCH_PREFIX}models:{self.queue}"

    @property
    def open(self) -> str:
        """Hash: batch id → JSON (model, when sent, its requests' custom ids → job ids)."""
        return f"{MSGBATCH_PREFIX}open:{self.queue}"

    @property
    def sending(self) -> str:
        """Sorted set of the takes of requests being sent, not yet known to be in a
        batch (score: when taken, ms)."""
        return f"{MSGBATCH_PREFIX}sending:{self.queue}"

    def take(self, take_id: str) -> str:
        """One take's entries (a list)."""
        return f"{MSGBATCH_PREFIX}take:{self.queue}:{take_id}"

    @property
    def send_lease(self) -> str:
        """One worker at a time sends batches (SET NX PX)."""
        return f"{MSGBATCH_PREFIX}lease:send:{self.queue}"

    @property
    def poll_lease(self) -> str:
        """One worker at a time looks at open batches (SET NX PX)."""
        return f"{MSGBATCH_PREFIX}lease:poll:{self.queue}"


# --- the response cache -------------------------------------------------------------------------

#: An ``ok`` answer kept for requests that ask for it (``cache_ttl``): ``<prefix><sha256>``
#: (64 hex digits), a JSON string with a time to live. The hash covers the chain, its models
#: as configured, the messages and the schema (llm_router.worker.cache).
CACHE_PREFIX = "llm_router:cache:"
#: SCAN's pattern for the entries alone: the prefix and 64 characters (not the stats hash).
CACHE_MATCH = CACHE_PREFIX + "?" * 64
#: Hash of every worker's lookups: ``hits``, ``misses``, ``stores`` (delete to reset).
CACHE_STATS_KEY = "llm_router:cache:stats"


def cache_key(digest: str) -> str:
    return CACHE_PREFIX + digest
