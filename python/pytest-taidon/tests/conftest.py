# The tests run inner pytest sessions in temporary directories and check their outcomes.
pytest_plugins = ["pytester"]
