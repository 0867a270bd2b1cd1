"""DSV4 conformance harness: subjects (implementations under test), cases, checks, results, reports."""
