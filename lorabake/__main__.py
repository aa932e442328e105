from lorabake.cli import main

main()
