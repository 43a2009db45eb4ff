"""Kafka upload topic and the Flink job that keeps tables fresh (issue: streaming)."""
