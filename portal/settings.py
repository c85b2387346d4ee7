"""Settings for Backend Portal, driven by environment variables.

Every knob is documented in the README's configuration table. Defaults give the embedded shape: SQLite, the
django-q2 ORM broker and a backends directory under the data folder.
"""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import socket
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    """An integer setting; a malformed value keeps the default and is reported by a system check."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        INVALID_SETTINGS.append(f"{name}={value!r} is not a whole number")
        return default


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


# Misconfigurations found while reading the environment; backends_app.checks reports them.
INVALID_SETTINGS: list[str] = []


def _private(path: Path, mode: int) -> None:
    """Narrow an existing file or directory of ours to `mode`; leave other owners' paths alone."""
    try:
        info = path.stat()
        if info.st_uid == os.geteuid() and info.st_mode & 0o777 != mode:
            path.chmod(mode)
    except FileNotFoundError:
        pass


DATA_DIR = Path(env_str("PORTAL_DATA_DIR", str(BASE_DIR / "data"))).resolve()
# 0700: the database, the secret key, sessions, API tokens and gallery credentials live here.
DATA_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
_private(DATA_DIR, 0o700)


def _secret_key() -> str:
    """The secret key: from the environment, else one generated once and kept in the data folder."""
    key = env_str("PORTAL_SECRET_KEY") or env_str("SECRET_KEY")
    if key:
        return key
    key_file = DATA_DIR / "secret_key"
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("PORTAL_DEBUG", False)
ALLOWED_HOSTS = env_list("PORTAL_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("PORTAL_CSRF_TRUSTED_ORIGINS")


def env_proxy_ssl_header(name: str) -> tuple[str, str] | None:
    """`X-Forwarded-Proto` or `X-Forwarded-Proto: https`: the header a TLS proxy sets, and the value
    meaning the client spoke HTTPS (default `https`), as Django's SECURE_PROXY_SSL_HEADER wants it.

    Only set it when every request comes through a proxy that sets or strips that header: otherwise a
    client could claim HTTPS by sending it.
    """
    value = env_str(name)
    if not value:
        return None
    header, _, expected = value.partition(":")
    header, expected = header.strip(), expected.strip() or "https"
    if not header or not all(c.isalnum() or c == "-" for c in header):
        INVALID_SETTINGS.append(f"{name}={value!r} is not a header name (e.g. X-Forwarded-Proto)")
        return None
    return "HTTP_" + header.upper().replace("-", "_"), expected


# Behind a TLS-terminating proxy: cookies only over HTTPS, and HTTPS recognised from the proxy's header.
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("PORTAL_SECURE_COOKIES", False)
SECURE_PROXY_SSL_HEADER = env_proxy_ssl_header("PORTAL_SECURE_PROXY_SSL_HEADER")

INSTALLED_APPS = [
    "backends_app.apps.PortalAdminConfig",  # django.contrib.admin with the portal's site
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_q",
    "channels",
    "backends_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "portal.urls"
ASGI_APPLICATION = "portal.asgi.application"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "backends_app.permissions.template_context",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL") or f"sqlite:///{DATA_DIR / 'portal.sqlite3'}",
        conn_max_age=env_int("PORTAL_DB_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web server and the worker are separate processes sharing one file: wait for the write
    # lock instead of failing, and start write transactions eagerly so they queue in order.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": env_int("PORTAL_DB_BUSY_TIMEOUT", 30),
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # A file, not memory, so the processes a test starts (workers, commands) share its database.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-portal.sqlite3")}


def _private_sqlite(name: str) -> None:
    """Create the SQLite file 0600 before SQLite does (it would make it 0644), and narrow one made
    earlier. SQLite gives its -wal and -shm files the database file's mode."""
    if not name or name == ":memory:" or name.startswith("file:"):
        return
    path = Path(name)
    if path.parent.is_dir() and not path.exists():
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        _private(candidate, 0o600)


if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    _private_sqlite(str(DATABASES["default"]["NAME"]))

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("PORTAL_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True
# One date format everywhere (the admin, the pages, the job log): portal/formats/en/formats.py.
FORMAT_MODULE_PATH = ["portal.formats"]

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise warns on every request while it is missing
STATICFILES_DIRS = [BASE_DIR / "static"]  # the pages' own CSS and scripts
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

LOGIN_URL = "admin:login"

# --- Channels -------------------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- django-q2 ------------------------------------------------------------------------------
PORTAL_TASK_TIMEOUT = env_int("PORTAL_TASK_TIMEOUT", 3600)
# Request bodies past this are refused (413) before they are read; Django's own limit on what it
# parses stays DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB).
PORTAL_MAX_REQUEST_BYTES = env_int("PORTAL_MAX_REQUEST_BYTES", 10 * 1024 * 1024)
Q_CLUSTER = {
    "name": env_str("PORTAL_Q_CLUSTER", "portal"),
    "workers": env_int("PORTAL_WORKERS", 2),
    "timeout": PORTAL_TASK_TIMEOUT,
    "retry": PORTAL_TASK_TIMEOUT + 60,
    "max_attempts": 1,
    "orm": "default",
    "catch_up": False,
    "ack_failures": True,
    "poll": 0.5,
    "label": "Tasks",
    # `manage.py worker --node NAME` runs a cluster named NAME (Q_CLUSTER_NAME): the queue for that
    # node's jobs. django-q2 reads per-cluster overrides from here and needs the key to exist.
    "ALT_CLUSTERS": {},
}

# --- REST framework -------------------------------------------------------------------------
# Token first: an anonymous request then gets 401 with `WWW-Authenticate: Token` rather than 403.
# Bearer accepts the same tokens in the header LocalAI clients send (`Authorization: Bearer <key>`).
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "backends_app.api.authentication.BearerTokenAuthentication",
        "backends_app.api.authentication.ApiKeyHeaderAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["backends_app.api.permissions.PortalPermission"],
    "DEFAULT_PAGINATION_CLASS": "backends_app.api.pagination.PortalPagination",
    # JSON bodies only: form encoding would read a blank field as an absent one.
    "DEFAULT_PARSER_CLASSES": ["backends_app.api.parsers.JSONBodyParser"],
    "PAGE_SIZE": 100,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "backends_app.api.errors.exception_handler",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Backend Portal API",
    "DESCRIPTION": (
        "Track, check, upgrade and roll back LocalAI backends. The portal's own API is under /api/v1/ "
        "and follows REST conventions; LocalAI's routes (/backends/..., tag `localai`; /api/backends/... "
        "and /api/operations/..., tag `localai-ui`) answer with LocalAI's paths and JSON shapes. "
        "See docs/api.md."
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    # Served from the sidecar package through our own static files: the docs page works offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "JobKindEnum": "backends_app.models.JobKind",
        "JobStatusEnum": "backends_app.models.JobStatus",
        "JobPhaseEnum": "backends_app.models.JobPhase",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "backends_app.api.schema.document_auth_errors",
        "backends_app.api.schema.forbid_unknown_fields",
    ],
}

# --- The portal's own knobs ------------------------------------------------------------------
DEFAULT_GALLERIES = "localai=github:mudler/LocalAI/backend/index.yaml@master"
PORTAL_GALLERIES = env_str("PORTAL_GALLERIES", DEFAULT_GALLERIES)
PORTAL_BACKENDS_PATH = Path(env_str("PORTAL_BACKENDS_PATH", str(DATA_DIR / "backends"))).resolve()
# Staging, journal and kept versions: beside the backends directory (same filesystem, so renames are
# atomic) but outside it, where LocalAI does not list them as backends.
PORTAL_STATE_PATH = Path(
    env_str("PORTAL_STATE_PATH", str(PORTAL_BACKENDS_PATH.parent / f".{PORTAL_BACKENDS_PATH.name}-portal"))
).resolve()
PORTAL_NODE_NAME = env_str("PORTAL_NODE_NAME", socket.gethostname() or "local")
# The django-q2 cluster that runs this node's jobs ("" = the default workers); `manage.py worker
# --node NAME` sets it to NAME.
PORTAL_NODE_QUEUE = env_str("PORTAL_NODE_QUEUE")
PORTAL_CAPABILITY = env_str("PORTAL_CAPABILITY") or env_str("LOCALAI_FORCE_META_BACKEND_CAPABILITY")
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
    platform.machine().lower(), platform.machine().lower()
)
PORTAL_PLATFORM = env_str("PORTAL_PLATFORM", f"{platform.system().lower()}/{_ARCH}")


def env_setting_lock(*names: str) -> tuple[str, str, bool] | None:
    """(variable, text, value) of the first of `names` set, read as LocalAI reads a flag: true, 1, yes
    or false, 0, no in any case (plus on/off). A malformed value locks nothing; a system check says so."""
    for name in names:
        text = env_str(name)
        if not text:
            continue
        value = {"true": True, "1": True, "yes": True, "on": True}.get(text.lower())
        if value is None and text.lower() not in {"false", "0", "no", "off"}:
            INVALID_SETTINGS.append(f"{name}={text!r} is not true, 1, yes, false, 0 or no")
            return None
        return name, text, bool(value)
    return None


# Settings the environment decides while it is set, as LocalAI's precedence has it (environment over
# runtime_settings.json over defaults): {field: (variable, text, value)}. Our spelling first, then LocalAI's.
# Only a true value locks: false is LocalAI's default, which LocalAI cannot tell from no value at all,
# so there the stored setting (the file, the admin, the pages, the API) decides. See docs/settings.md.
_AUTO_UPGRADE_ENV = env_setting_lock(
    "PORTAL_AUTO_UPGRADE", "LOCALAI_AUTO_UPGRADE_BACKENDS", "AUTO_UPGRADE_BACKENDS"
)
PORTAL_SETTINGS_FROM_ENVIRONMENT: dict[str, tuple[str, str, bool]] = (
    {"auto_upgrade_backends": _AUTO_UPGRADE_ENV} if _AUTO_UPGRADE_ENV and _AUTO_UPGRADE_ENV[2] else {}
)
# LocalAI's PreferDevelopmentBackends: install a `latest-X` image from its branch tag (`master-X`)
# first, the released one as its first fallback. A true value in the environment decides while set;
# else runtime_settings.json's `prefer_development_backends` (false when absent). See docs/settings.md.
_PREFER_DEV_ENV = env_setting_lock(
    "PORTAL_PREFER_DEV_BACKENDS", "LOCALAI_PREFER_DEV_BACKENDS", "PREFER_DEV_BACKENDS"
)
PORTAL_PREFER_DEV_BACKENDS = bool(_PREFER_DEV_ENV and _PREFER_DEV_ENV[2])
# LocalAI's configuration directory, holding the runtime_settings.json both share. Unset: beside the
# backends directory (`<dir>/backends` and `<dir>/configuration`, LocalAI's own defaults); "off":
# the file is neither read nor written.
PORTAL_CONFIG_DIR = env_str("PORTAL_CONFIG_DIR") or env_str("LOCALAI_CONFIG_DIR")
# Seconds between two looks at runtime_settings.json by the web and worker processes; 0: read at start only.
PORTAL_CONFIG_POLL_INTERVAL = env_int("PORTAL_CONFIG_POLL_INTERVAL", 2)
PORTAL_INSECURE_REGISTRIES = env_list("PORTAL_INSECURE_REGISTRIES")
PORTAL_REGISTRY_TIMEOUT = env_int("PORTAL_REGISTRY_TIMEOUT", 30)
PORTAL_REGISTRY_RETRIES = env_int("PORTAL_REGISTRY_RETRIES", 3)
# Registry requests in flight during a check (its thread pool), and at most to one registry host
# (the connections kept open to it). A distant registry mostly makes a lookup wait, so many pay off.
PORTAL_REGISTRY_CONCURRENCY = env_int("PORTAL_REGISTRY_CONCURRENCY", 32)
# Seconds a registry may answer nothing but HTTP 429 before the requests waiting on it fail; until
# then a 429 slows that host down (half the requests in flight, Retry-After waited for by all).
PORTAL_REGISTRY_RATE_LIMIT_PATIENCE = env_int("PORTAL_REGISTRY_RATE_LIMIT_PATIENCE", 120)
# A download slower than SPEED_LIMIT bytes/s over SPEED_TIME seconds is cut off (and resumed, within
# the retries); no blob may take longer than BLOB_DEADLINE seconds. 0 turns a limit off.
PORTAL_REGISTRY_SPEED_LIMIT = env_int("PORTAL_REGISTRY_SPEED_LIMIT", 1024)
PORTAL_REGISTRY_SPEED_TIME = env_int("PORTAL_REGISTRY_SPEED_TIME", 60)
PORTAL_REGISTRY_BLOB_DEADLINE = env_int("PORTAL_REGISTRY_BLOB_DEADLINE", 3600)
PORTAL_REGISTRY_AUTH_FILE = env_str("PORTAL_REGISTRY_AUTH_FILE", os.path.expanduser("~/.docker/config.json"))
PORTAL_GALLERY_TIMEOUT = env_int("PORTAL_GALLERY_TIMEOUT", 30)
# Signatures (docs/signatures.md): the Sigstore trust root (a trusted_root.json or ClientTrustConfig
# file; empty: the public-good root shipped with sigstore, offline), and LocalAI's strict integrity,
# which enforces every gallery's policy and refuses installs from a gallery that has none.
PORTAL_SIGSTORE_TRUSTED_ROOT = env_str("PORTAL_SIGSTORE_TRUSTED_ROOT")
PORTAL_REQUIRE_SIGNATURES = env_bool(
    "PORTAL_REQUIRE_SIGNATURES",
    env_bool("LOCALAI_REQUIRE_BACKEND_INTEGRITY", env_bool("REQUIRE_BACKEND_INTEGRITY", False)),
)
# `manage.py worker` and `serve`: seconds between heartbeats (a node is offline after 90 s without
# one), and seconds a stopping process gets before its process group is killed.
PORTAL_HEARTBEAT_INTERVAL = env_int("PORTAL_HEARTBEAT_INTERVAL", 30)
PORTAL_SHUTDOWN_GRACE = env_int("PORTAL_SHUTDOWN_GRACE", 30)


# Bounds on a gallery document (docs/galleries.md): its size, its entries, and its YAML nodes once
# each alias counts as what it repeats (what parsing costs in time and memory).
def env_positive(name: str, default: int) -> int:
    value = env_int(name, default)
    if value < 1:
        INVALID_SETTINGS.append(f"{name}={value} must be at least 1")
        return default
    return value


# Pulls (docs/oci.md#pulls): connections open at once over all layers, layers downloaded at once,
# MiB fetched by one ranged request; days a partly downloaded blob is kept for a retry to resume;
# how many times a worker that restarts re-queues an install it was killed downloading.
PORTAL_PULL_CONNECTIONS = env_positive("PORTAL_PULL_CONNECTIONS", 8)
PORTAL_PULL_LAYERS = env_positive("PORTAL_PULL_LAYERS", 4)
PORTAL_PULL_PART_MIB = env_positive("PORTAL_PULL_PART_MIB", 16)
PORTAL_PULL_BLOB_MAX_AGE_DAYS = env_positive("PORTAL_PULL_BLOB_MAX_AGE_DAYS", 3)
PORTAL_PULL_RESUME_ATTEMPTS = env_int("PORTAL_PULL_RESUME_ATTEMPTS", 2)
PORTAL_GALLERY_MAX_BYTES = env_positive("PORTAL_GALLERY_MAX_BYTES", 32 * 1024 * 1024)
PORTAL_GALLERY_MAX_ENTRIES = env_positive("PORTAL_GALLERY_MAX_ENTRIES", 50_000)
PORTAL_GALLERY_MAX_NODES = env_positive("PORTAL_GALLERY_MAX_NODES", 2_500_000)
# Where file:// galleries set through the API or the admin may be read from; the command line and
# PORTAL_GALLERIES may name any file.
PORTAL_GALLERY_FILE_ROOTS = [
    Path(item).resolve() for item in env_list("PORTAL_GALLERY_FILE_ROOTS", str(DATA_DIR))
]

# Backends that are not images (docs/operations.md#backends-that-are-not-images). The directories a
# gallery entry or a web request may name as a backend's source, or as a file:// archive (empty: the
# data directory and the backends directory's parent); the command line may name any directory.
PORTAL_BACKEND_SOURCE_ROOTS = [Path(item).resolve() for item in env_list("PORTAL_BACKEND_SOURCE_ROOTS")]
# Refuse an archive whose gallery entry has no sha256 (default: install it, with a warning).
PORTAL_REQUIRE_BACKEND_INTEGRITY = env_bool(
    "PORTAL_REQUIRE_BACKEND_INTEGRITY",
    env_bool("LOCALAI_REQUIRE_BACKEND_INTEGRITY", env_bool("REQUIRE_BACKEND_INTEGRITY", False)),
)
# LocalAI's tag fallbacks: a missing `latest-X` image is tried as `master-X`, then `master-X-development`.
PORTAL_BACKEND_RELEASE_TAG = env_str("LOCALAI_BACKEND_IMAGES_RELEASE_TAG") or "latest"
PORTAL_BACKEND_BRANCH_TAG = env_str("LOCALAI_BACKEND_IMAGES_BRANCH_TAG") or "master"
PORTAL_BACKEND_DEV_SUFFIX = env_str("LOCALAI_BACKEND_DEV_SUFFIX") or "development"
# `manage.py worker`: seconds between two looks at the backends directory for backends others
# installed, changed or removed (LocalAI, by hand); 0 turns the watch off.
PORTAL_WATCH_INTERVAL = env_int("PORTAL_WATCH_INTERVAL", 2)

# Notifications (docs/notifications.md). PORTAL_NOTIFY_URLS gives the initial list of Apprise URLs;
# afterwards the stored list (admin, settings page, API) wins. Links in messages start with
# PORTAL_BASE_URL, the address operators reach the portal at.
PORTAL_NOTIFY_URLS = env_list("PORTAL_NOTIFY_URLS")
PORTAL_BASE_URL = env_str("PORTAL_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
PORTAL_NOTIFY_WINDOW = env_int("PORTAL_NOTIFY_WINDOW", 60)
PORTAL_NOTIFY_CHECK_FAILURES = env_int("PORTAL_NOTIFY_CHECK_FAILURES", 3)
PORTAL_NOTIFY_ATTEMPTS = env_int("PORTAL_NOTIFY_ATTEMPTS", 5)
PORTAL_NOTIFY_RETRY_SECONDS = env_int("PORTAL_NOTIFY_RETRY_SECONDS", 60)
PORTAL_NOTIFY_TIMEOUT = env_int("PORTAL_NOTIFY_TIMEOUT", 30)
PORTAL_NOTIFY_TEST_TIMEOUT = env_int("PORTAL_NOTIFY_TEST_TIMEOUT", 10)

# --- Metrics (/metrics; docs/monitoring.md) ---------------------------------------------------
# prometheus_client chooses where counters live when it is first imported, from this variable. It
# is set here, before any app imports prometheus_client, so that every process of this host (web
# replicas, workers, commands) and every process they start counts into the same directory. One
# directory per host name: the processes sharing one must share a pid namespace (dead ones are
# found by pid).
PORTAL_METRICS_DIR = Path(
    env_str("PROMETHEUS_MULTIPROC_DIR") or str(DATA_DIR / "prometheus" / (socket.gethostname() or "local"))
).resolve()
PORTAL_METRICS_DIR.mkdir(parents=True, exist_ok=True)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(PORTAL_METRICS_DIR)
PORTAL_METRICS_TOKEN = env_str("PORTAL_METRICS_TOKEN")
# Off behind a reverse proxy on the same host: every proxied request then comes from 127.0.0.1.
PORTAL_METRICS_LOOPBACK = env_bool("PORTAL_METRICS_LOOPBACK", True)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("PORTAL_LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        # Its DEBUG lines carry whole request URLs, a gallery's ?token=... included.
        "urllib3.connectionpool": {"level": "INFO"},
    },
}
