"""Reports: tables and plots that experiment scripts write from their results files.

Scripts stay thin (read a config, measure, call these); the numbers in every report come from
a results file, never typed by hand.
"""
