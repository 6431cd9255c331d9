# Issue 16: the provider's usage details (cached prompt tokens, reasoning tokens), recorded when it reports them.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('quotas', '0006_auditentry_key_deleted'),
    ]

    operations = [
        migrations.AddField(
            model_name='usage',
            name='cached_tokens',
            field=models.PositiveIntegerField(blank=True, help_text='Of the prompt tokens, those the provider read from its cache.', null=True),
        ),
        migrations.AddField(
            model_name='usage',
            name='reasoning_tokens',
            field=models.PositiveIntegerField(blank=True, help_text='Of the completion tokens, those spent on reasoning.', null=True),
        ),
    ]
