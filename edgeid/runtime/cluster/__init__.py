"""Case ingest across a lab's boxes on Ray (README "Large cases on several boxes")."""
