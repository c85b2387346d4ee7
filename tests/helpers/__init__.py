"""Code the tests share; holds no tests."""
