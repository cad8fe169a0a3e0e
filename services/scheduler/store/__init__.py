"""Durable scheduler state: the SchedulerStore protocol, its in-memory and PostgreSQL implementations, the tables."""
