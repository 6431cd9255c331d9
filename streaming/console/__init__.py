"""The operators' console for the streaming side: the catalogue in the admin (catalogue.py), its connection test
(connection.py), its audit entries (audit.py), and what the quotas console reads of the catalogue (sources.py,
registered in quotas/domain/catalogue.py by streaming/apps.py: quotas never imports streaming)."""
