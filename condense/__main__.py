from condense.cli import main

main()
