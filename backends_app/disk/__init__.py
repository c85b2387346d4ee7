"""The disk: LocalAI's layout (`layout`), the journal of operations in flight (`journal`), health
checks (`health`) and the crash-safe file primitives they are built on (`fsops`). No ORM, no network.
"""
