"""Jobs get a UUID, the id LocalAI's routes use; existing jobs are given one each."""

from __future__ import annotations

import uuid

from django.db import migrations, models


def fill_uuids(apps, schema_editor):  # type: ignore[no-untyped-def]
    UpgradeJob = apps.get_model("backends_app", "UpgradeJob")
    for job in UpgradeJob.objects.filter(uuid__isnull=True).only("pk").iterator():
        UpgradeJob.objects.filter(pk=job.pk).update(uuid=uuid.uuid4())


class Migration(migrations.Migration):
    dependencies = [
        ("backends_app", "0008_backend_source_trusted"),
    ]

    operations = [
        migrations.AddField(
            model_name="upgradejob",
            name="uuid",
            field=models.UUIDField(null=True, editable=False),
        ),
        migrations.RunPython(fill_uuids, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="upgradejob",
            name="uuid",
            field=models.UUIDField(
                default=uuid.uuid4,
                editable=False,
                help_text="The job's id on LocalAI's routes, which name jobs by UUID (the portal's own API "
                "uses the number).",
                unique=True,
            ),
        ),
    ]
