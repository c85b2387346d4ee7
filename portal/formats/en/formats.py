"""Date formats for every page, the admin and the job log: one format, ISO-like, with the time zone.

Django reads these through `FORMAT_MODULE_PATH` (portal/settings.py) wherever it renders a date itself
(the admin's lists and forms, `{{ value }}` in a template); `backends_app.templatetags.portal_format`
uses the same ones for the rest, so a moment reads the same everywhere.
"""

DATETIME_FORMAT = "Y-m-d H:i:s T"
SHORT_DATETIME_FORMAT = DATETIME_FORMAT
DATE_FORMAT = "Y-m-d"
SHORT_DATE_FORMAT = DATE_FORMAT
TIME_FORMAT = "H:i:s"
