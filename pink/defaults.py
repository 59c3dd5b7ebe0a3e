"""Tunables shared by every PINK process: each with its unit and meaning.

Everything that is named once and used by several parts (etcd prefix, queue
names, TTLs) is defined here so that no two modules disagree.
"""

ETCD_PREFIX = "/pink"  # root of every key PINK writes to etcd

NODE_TTL = 10  # seconds: a runner's lease; its record vanishes this long after it dies
LEADER_TTL = 10  # seconds: the queue leader's lease on the leader key
RECONCILE_INTERVAL = 2.0  # seconds between two passes of the leader over all tasks
MAX_ATTEMPTS = 3  # a task lost this many times ends `failed`
MAX_JOB_FAILURES = 8  # a transfer or run job failing this often fails its task (~8 min of backoff)

OUTPUT_DAYS = 14.0  # days an output and its logs are kept after the task ends
MAX_OUTPUT_BYTES_PER_USER = 500 * 2**30  # bytes of one user's stored outputs; beyond, their oldest expire
MAX_LOG_BYTES = 8 * 2**20  # bytes of a log archived (its end); MariaDB's max_allowed_packet is 16 MiB
SWEEP_INTERVAL = 60.0  # seconds between the leader's retention sweeps
SWEEP_GRACE = 3600.0  # seconds a file no task references may stay (it may be being written)
PUBLISHED_POSITIONS = 5000  # waiting tasks whose queue position the leader publishes (one etcd value)

MAX_UPLOAD_BYTES = 64 * 2**30  # bytes: largest image archive accepted

# Per-user limits ([limits]); each refusal names the limit it hit.
LIVE_TASKS_PER_USER = 500  # tasks one user may have in etcd (queued to exported)
UPLOAD_BYTES_PER_USER = 500 * 2**30  # bytes of images held by a user's live tasks and open uploads
UPLOAD_SESSIONS_PER_USER = 16  # layer-upload sessions one user may hold open
OUTPUT_BYTES_PER_TASK = 100 * 2**30  # bytes of one task's export; more fails the task
LOG_STREAMS_PER_USER = 8  # followed logs one user may hold open on one web node
LOG_STREAMS_PER_NODE = 32  # followed logs one web node serves at once (half its threads)
LOG_FOLLOW_SECONDS = 3600  # seconds one follow of a log lasts; the CLI and page then resume it
RECORD_BYTES = 64 * 2**10  # bytes of a task's parameters (name, env, command, entrypoint)
UPLOAD_CHUNK = 1 << 20  # bytes read from the request per step while spooling
SPOOL_INCOMING = "incoming"  # in a runner's spool: blobs the transfer account wrote, not trusted yet
SPOOL_HELD = "held"  # in a runner's spool: an empty marker per blob the runner verified and keeps
RUNNER_BLOB_BUDGET = 200 * 2**30  # bytes of verified image blobs a runner keeps (reserved ones stay)
WEB_BLOB_BUDGET = 200 * 2**30  # bytes of image blobs a web node keeps for dedup (those in use stay)

STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL at a deadline or cancel
DEFAULT_TIMEOUT = 24 * 3600  # seconds a task may run when it names no timeout
MAX_RUN_SECONDS = 7 * 24 * 3600  # seconds: a runner's cap on any task's timeout

IMAGE_CACHE_REPO = "pink/cache"  # runners tag loaded images <this>:<archive sha256>

SSH_CIPHER = "aes128-gcm@openssh.com"  # fastest cipher paramiko speaks here
SFTP_CHUNK = 1 << 20  # bytes read from a file at a time when sending it over SFTP, and per log read

QUEUE_FINALIZE = "pink-finalize"  # shared: finalize pulls the export over SFTP
QUEUE_TRANSFER_PREFIX = "pink-transfer."  # + web host: the upload is on that host
JOB_TIMEOUT = 6 * 3600  # seconds an RQ job may take (a large image transfer)
