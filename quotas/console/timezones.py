"""The time zone select of the pages that edit a zone (a user's quota, a team): shared here, not in admin.py, so
that the page modules admin.py imports can use it without an import cycle."""

import zoneinfo

from django import forms


class TimezoneSelect:
    """A zone picked from the installed tz database's names (the model validates; no frozen choices)."""

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        if db_field.name == "timezone":
            kwargs["widget"] = forms.Select(choices=[(name, name) for name in sorted(zoneinfo.available_timezones())])
        return super().formfield_for_dbfield(db_field, request, **kwargs)
