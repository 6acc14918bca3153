from condense.app.cli import main

main()
