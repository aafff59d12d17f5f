"""Integrations of moeq checkpoints with serving engines (optional extras; nothing here is imported by ``moeq``)."""
